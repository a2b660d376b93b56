//! `levqor-sidecar reconcile`: the ledger against Stripe. Per tenant and
//! metric, the ledger's total for a period (by each entry's metered time, its
//! `period_end`) against the sum of Stripe's meter event summaries for the
//! same customer, meter and period. Entries not sent yet (after the cursor)
//! and parked ones are shown apart: drift is only what was sent and Stripe
//! does not have (or Stripe has and nobody sent).

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Datelike, TimeZone, Timelike, Utc};
use uuid::Uuid;

use super::stripe::Stripe;
use crate::config::{secret, Config};

pub struct Row {
    pub tenant: String,
    pub metric: String,
    pub database: f64,
    pub stripe: Option<f64>,
    pub pending: f64,
    pub parked: f64,
    pub status: &'static str,
}

/// Start of the current month (UTC): the default period.
pub fn month_start(now: DateTime<Utc>) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().expect("a month start")
}

fn floor_minute(t: DateTime<Utc>) -> DateTime<Utc> {
    t.with_second(0).and_then(|t| t.with_nanosecond(0)).expect("a minute")
}

pub async fn run(cfg: &Config, since: Option<DateTime<Utc>>) -> Result<bool, String> {
    let s = cfg.stripe.as_ref().ok_or("reconcile needs [stripe] in the configuration")?;
    let key = secret("stripe.api_key_env", &s.api_key_env).map_err(|e| e.to_string())?;
    let stripe = Stripe::new(&s.api_base, key, Duration::from_secs(s.timeout_seconds));
    let target = crate::db::Target { url: cfg.database.url.clone(), password_env: cfg.database.password_env.clone() };
    let db = crate::db::connect(&target).await.map_err(|e| format!("database: {e}"))?;
    // Stripe summarises by minute: the period is whole minutes, through the
    // end of the current one (so usage metered a moment ago counts).
    let now = Utc::now();
    let start = floor_minute(since.unwrap_or_else(|| month_start(now)));
    let end = floor_minute(now) + chrono::Duration::minutes(1);
    if start >= end {
        return Err(format!("--since {start} is in the future"));
    }
    let meters: HashMap<String, String> = stripe.meters().await.map_err(|e| e.to_string())?.into_iter().collect();
    let rows = db
        .client
        .query(
            "SELECT tenant_id, slug, customer_id, metric, sent::text, pending::text, parked::text
               FROM levqor.billing_totals($1, $2, $3)",
            &[&s.consumer, &start, &end],
        )
        .await
        .map_err(|e| format!("database: {}", crate::db::describe(&e)))?;
    let mut out = Vec::new();
    for r in rows {
        let metric: String = r.get("metric");
        let Some(event) = s.meters.get(&metric) else { continue };
        let slug: Option<String> = r.get("slug");
        let tenant: Uuid = r.get("tenant_id");
        let customer: Option<String> = r.get("customer_id");
        // Sums of bigints: exact as text, compared as f64 (Stripe's is a float).
        let num = |c: &str| -> f64 { r.get::<_, String>(c).parse::<i128>().unwrap_or_default() as f64 };
        let (sent, pending, parked) = (num("sent"), num("pending"), num("parked"));
        let in_stripe = match (customer.as_deref(), meters.get(event)) {
            (Some(c), Some(m)) => Some(stripe.meter_total(m, c, start.timestamp(), end.timestamp()).await.map_err(|e| e.to_string())?),
            (Some(_), None) => None,
            (None, _) => Some(0.0),
        };
        let status = match in_stripe {
            None => "no meter",
            Some(x) if (x - sent).abs() < 0.5 => {
                if pending > 0.0 {
                    "ok, pending"
                } else {
                    "ok"
                }
            }
            // Accepted by Stripe but the cursor not yet moved past them: in flight.
            Some(x) if x > sent && x <= sent + pending + 0.5 => "in flight",
            Some(_) => "DRIFT",
        };
        out.push(Row {
            tenant: slug.unwrap_or_else(|| tenant.to_string()),
            metric,
            database: sent,
            stripe: in_stripe,
            pending,
            parked,
            status,
        });
    }
    print_table(&out, start, end);
    let drift = out.iter().any(|r| r.status == "DRIFT" || r.status == "no meter");
    if drift {
        println!(
            "hint: drift is ledger usage sent to Stripe that its meter summaries do not show (or the reverse). \
             Stripe aggregates meter events asynchronously: run reconcile again in a minute; if it persists, \
             compare levqor.usage_ledger with the customer's meter events in Stripe, and check levqor.billing_parked."
        );
    }
    Ok(!drift)
}

fn print_table(rows: &[Row], start: DateTime<Utc>, end: DateTime<Utc>) {
    println!("period {} .. {} (UTC, end exclusive)", start.format("%Y-%m-%dT%H:%M:%SZ"), end.format("%Y-%m-%dT%H:%M:%SZ"));
    let w = rows.iter().map(|r| r.tenant.len()).max().unwrap_or(6).max(6);
    let m = rows.iter().map(|r| r.metric.len()).max().unwrap_or(6).max(6);
    println!("{:w$}  {:m$}  {:>14}  {:>14}  {:>12}  {:>10}  {:>10}  status", "tenant", "metric", "database", "stripe", "difference", "pending", "parked");
    for r in rows {
        let stripe = r.stripe.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
        let diff = r.stripe.map(|x| format!("{:.0}", r.database - x)).unwrap_or_else(|| "-".into());
        println!(
            "{:w$}  {:m$}  {:>14.0}  {:>14}  {:>12}  {:>10.0}  {:>10.0}  {}",
            r.tenant, r.metric, r.database, stripe, diff, r.pending, r.parked, r.status
        );
    }
    if rows.is_empty() {
        println!("(no metered usage in this period)");
    }
}
