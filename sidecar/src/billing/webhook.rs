//! `POST /stripe/webhook`: Stripe's events, verified and applied.
//!
//! The `Stripe-Signature` header (`t=<unix seconds>,v1=<hex>,…`) must hold a
//! `v1` that is the HMAC-SHA256 of `"<t>.<raw body>"` under the endpoint
//! secret (any of several `v1` values may match; compared in constant time),
//! with `t` within 300 s of now. Anything else, and any body that is not an
//! event, is answered 400 and changes nothing. A verified event goes to
//! `levqor.billing_webhook`, which applies each event id once and keeps
//! out-of-order subscription events from undoing newer ones.

use chrono::{TimeZone, Utc};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

use crate::config::Stripe as StripeConfig;

pub const TOLERANCE_SECONDS: i64 = 300;

#[derive(Debug, PartialEq)]
pub enum Refusal {
    MissingSignature,
    BadSignature,
    Stale,
    Malformed(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::MissingSignature => f.write_str("no Stripe-Signature header"),
            Refusal::BadSignature => f.write_str("the signature does not match"),
            Refusal::Stale => write!(f, "the signature's timestamp is more than {TOLERANCE_SECONDS} s away"),
            Refusal::Malformed(why) => write!(f, "not a Stripe event: {why}"),
        }
    }
}

/// Check a signature header against the raw body.
pub fn verify(header: Option<&str>, body: &[u8], secret: &str, now: i64) -> Result<(), Refusal> {
    let header = header.ok_or(Refusal::MissingSignature)?;
    let mut t: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        let Some((k, v)) = part.trim().split_once('=') else { continue };
        match k {
            "t" => t = v.parse().ok(),
            "v1" => {
                if let Ok(sig) = hex::decode(v) {
                    signatures.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or(Refusal::BadSignature)?;
    if signatures.is_empty() {
        return Err(Refusal::BadSignature);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let expected = mac.finalize().into_bytes();
    // Every candidate is compared, in constant time.
    let matched = signatures.iter().fold(false, |acc, s| acc | bool::from(subtle::ConstantTimeEq::ct_eq(s.as_slice(), expected.as_slice())));
    if !matched {
        return Err(Refusal::BadSignature);
    }
    if (now - t).abs() > TOLERANCE_SECONDS {
        return Err(Refusal::Stale);
    }
    Ok(())
}

/// A verified event, as `levqor.billing_webhook` takes it.
#[derive(Debug, PartialEq)]
pub struct Event {
    pub id: String,
    pub kind: String,
    pub created: chrono::DateTime<Utc>,
    pub customer: Option<String>,
    pub plan: Option<String>,
    pub subscription_status: Option<String>,
}

pub fn parse(body: &[u8], stripe: &StripeConfig) -> Result<Event, Refusal> {
    let v: Value = serde_json::from_slice(body).map_err(|e| Refusal::Malformed(e.to_string()))?;
    let field = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
    let id = field("/id").filter(|i| i.starts_with("evt_")).ok_or_else(|| Refusal::Malformed("no event id".into()))?;
    let kind = field("/type").ok_or_else(|| Refusal::Malformed("no type".into()))?;
    let created = v
        .get("created")
        .and_then(Value::as_i64)
        .and_then(|c| Utc.timestamp_opt(c, 0).single())
        .ok_or_else(|| Refusal::Malformed("no created time".into()))?;
    let object = v.pointer("/data/object").ok_or_else(|| Refusal::Malformed("no data.object".into()))?;
    let customer = match object.get("customer") {
        Some(Value::String(c)) => Some(c.clone()),
        Some(o) => o.get("id").and_then(Value::as_str).map(str::to_owned),
        None => None,
    };
    let (mut plan, mut status) = (None, None);
    if kind.starts_with("customer.subscription.") {
        let prices: Vec<String> = object
            .pointer("/items/data")
            .and_then(Value::as_array)
            .map(|items| items.iter().filter_map(|i| i.pointer("/price/id").and_then(Value::as_str).map(str::to_owned)).collect())
            .unwrap_or_default();
        plan = super::plan_for_prices(&stripe.plans, &prices);
        status = object.get("status").and_then(Value::as_str).map(str::to_owned);
    }
    Ok(Event { id, kind, created, customer, plan, subscription_status: status })
}

/// The event types levqor acts on; others are answered 200 and logged.
pub fn handled(kind: &str) -> bool {
    matches!(
        kind,
        "customer.subscription.updated" | "customer.subscription.deleted" | "invoice.payment_failed" | "invoice.paid"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(t: i64, body: &[u8], secret: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.").as_bytes());
        mac.update(body);
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn signatures_are_checked_like_stripe_does() {
        let body = br#"{"id":"evt_1"}"#;
        let now = 1_800_000_000;
        let good = sign(now, body, "whsec_test");
        assert_eq!(verify(Some(&format!("t={now},v1={good}")), body, "whsec_test", now), Ok(()));
        // Any of several v1 values; v0 and unknown parts are ignored.
        let h = format!("t={now},v0=abc,v1={},v1={good},x=y", "00".repeat(32));
        assert_eq!(verify(Some(&h), body, "whsec_test", now), Ok(()));
        assert_eq!(verify(None, body, "whsec_test", now), Err(Refusal::MissingSignature));
        assert_eq!(verify(Some(&format!("t={now},v1={good}")), br#"{"id":"evt_2"}"#, "whsec_test", now), Err(Refusal::BadSignature));
        assert_eq!(verify(Some(&format!("t={now},v1={good}")), body, "whsec_other", now), Err(Refusal::BadSignature));
        assert_eq!(verify(Some(&format!("v1={good}")), body, "whsec_test", now), Err(Refusal::BadSignature));
        assert_eq!(verify(Some("garbage"), body, "whsec_test", now), Err(Refusal::BadSignature));
        let old = now - 301;
        let stale = sign(old, body, "whsec_test");
        assert_eq!(verify(Some(&format!("t={old},v1={stale}")), body, "whsec_test", now), Err(Refusal::Stale));
    }
}
